"""`python -m compressor …` is `lrc …` (what `torchrun -m compressor` and `accelerate launch -m compressor` run)."""

from compressor.cli import main

if __name__ == "__main__":
    main()
