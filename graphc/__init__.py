"""graphc: a static graph compiler for Caffe nets."""
