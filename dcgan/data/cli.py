import argparse
def add_data_commands(commands: argparse._SubParsersAction) -> None:
    pass
