"""seqtool: RNN encoder-decoders for text, trained and run from the command line."""

__version__ = "0.1.0"
