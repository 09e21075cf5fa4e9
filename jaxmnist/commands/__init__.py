"""The command-line programs: thin layers of flags and printing over the library. The library never imports them."""
