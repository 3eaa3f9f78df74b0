"""The operator's terminal UI: a Textual app and a client of the socket like any other."""
