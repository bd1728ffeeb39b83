"""The command line: argparse, logging, signals, exit codes, and the run's summary."""
