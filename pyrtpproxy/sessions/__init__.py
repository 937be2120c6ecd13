"""Sessions and streams, tag matching, TTLs, latching rules, the port table, counters. Pure: explicit `now`, no I/O modules."""
