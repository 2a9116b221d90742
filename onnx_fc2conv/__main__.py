from .cli import main

if __name__ == "__main__":  # dask's worker processes (spawn) import this module again: they must not run the CLI
    raise SystemExit(main())
