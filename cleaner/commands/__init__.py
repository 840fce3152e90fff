"""The cleaner's commands, one module each; cleaner.cli is the one front that registers them."""
