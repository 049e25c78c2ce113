"""Code that runs inside the Caffe worker process (it imports pycaffe; nothing else here does)."""
