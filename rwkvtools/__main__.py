"""`python -m rwkvtools ...`: the same command as `rwkvtools ...`."""
from rwkvtools.entry import main

if __name__ == "__main__":
    main()
