"""``python -m midnight_train fit CONFIG key=value ...`` (also under ``accelerate launch -m``)."""

from midnight_train.cli import main

if __name__ == "__main__":
    main()
