"""One module per CLI verb: parse arguments -> build -> run -> save, read top to bottom."""
