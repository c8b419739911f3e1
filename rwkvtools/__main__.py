"""`python -m rwkvtools ...`: the same command as `rwkvtools ...`."""
from rwkvtools.cli import main

if __name__ == "__main__":
    main(prog_name="rwkvtools")
