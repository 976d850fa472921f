"""`python -m quailora_app` and the `quailora` command: the thread policy first, then the command line."""
import sys

from quailora_app.threads import apply_thread_policy


def run() -> int:
    apply_thread_policy()  # before torch loads: its OpenMP runtime reads the waiting policy once, as it loads
    from quailora_app.cli import main  # after the thread policy: importing the command line loads torch

    return main()


if __name__ == "__main__":
    sys.exit(run())
