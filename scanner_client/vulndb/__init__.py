"""The scanner's vulnerability database: real feeds imported, compiled into one SQLite file,
matched with each feed's own semantics, and updated while the scanner runs.

- :mod:`.sources` reads a feed (file, directory, zip, tar, http(s) URL);
- :mod:`.importers` turns OSV, Alpine secdb and Node.js WG records into advisories;
- :mod:`.build` merges them and :mod:`.store` writes and reads the compiled file;
- :mod:`.matcher` matches installed packages;
- :mod:`.update` builds a new file, verifies it and swaps it in.

See ``docs/scanners/vulnerability-database.md``.
"""
