"""Download the five DreamBooth dog photos (google/dreambooth, dataset/dog) next to this script."""

import sys
import urllib.request
from pathlib import Path

SOURCE = "https://raw.githubusercontent.com/google/dreambooth/main/dataset/dog/{name}"
NAMES = [f"{i:02d}.jpg" for i in range(5)]


def main() -> int:
    here = Path(__file__).resolve().parent
    for name in NAMES:
        target = here / name
        if target.is_file():
            print(f"{name}: already here")
            continue
        tmp = target.with_suffix(".part")
        urllib.request.urlretrieve(SOURCE.format(name=name), tmp)
        tmp.replace(target)
        print(f"{name}: downloaded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
