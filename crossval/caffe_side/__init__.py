"""Code that runs inside the Caffe worker process (it imports pycaffe; nothing else here does),
and what both sides of its pipe share, numpy only: the frames (``wire``) and the replies
(``replies``)."""
