"""The running server: command line, config, control transports, dispatcher, Trio application, notifications, metrics, process concerns."""
