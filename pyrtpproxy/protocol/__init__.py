"""The control language as data: E-codes, capabilities, command objects, the parser, framing, counter names. Pure: no I/O modules."""
