"""PyTorch reference implementations (NCHW), written from the papers and the reference
repositories' documented behaviour, used only to check equivalence."""
