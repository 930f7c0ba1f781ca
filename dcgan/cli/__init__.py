"""The `dcgan` command line: one module per group of commands, each adding its parser and a handler that
parses, calls one library function and returns an exit status; main.py puts them together and turns
errors into one line.
"""
