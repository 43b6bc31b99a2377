"""``python -m image_crawler`` is the ``image-crawler`` command."""

from .cli import main

main()
