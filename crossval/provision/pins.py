"""What crossval builds: the pinned Debian source package of BVLC Caffe and how it is built.

Everything that decides the bytes of a build lives here, and all of it goes into the
cache key (see ``cache.cache_key``).
"""

from __future__ import annotations

# Debian 11 ("bullseye") source package: BVLC master of 2018-08-21 plus Debian's quilt series.
SOURCE_PACKAGE = "caffe"
SOURCE_VERSION = "1.0.0+git20180821.99bd997-8"
SOURCE_SUITE = "bullseye"
UPSTREAM_REVISION = "99bd997"  # the BVLC commit named in the Debian version
UNPACKED_DIR = "caffe-1.0.0+git20180821.99bd997"

# SHA-256 of the three files of the source package. A mismatch is refused.
SOURCE_FILES: dict[str, str] = {
    "caffe_1.0.0+git20180821.99bd997-8.dsc": (
        "c492f4893fc1ba1fb514b2d9b4763bc78dc93571ea24adc6e604eccbb93cdd64"
    ),
    "caffe_1.0.0+git20180821.99bd997.orig.tar.gz": (
        "e0eb3f06794f7402c77b7dec8e8480273ee1a1bb192e9122b621a69d4147ad0c"
    ),
    "caffe_1.0.0+git20180821.99bd997-8.debian.tar.xz": (
        "07cf073227494a6b07234e40cb5df91db566616593eef9baafdc4d06ad159f21"
    ),
}
DSC_FILE = "caffe_1.0.0+git20180821.99bd997-8.dsc"

# Our own change on top of Debian's series: protobuf >= 3.20 dropped the two-argument
# CodedInputStream::SetTotalBytesLimit; Debian 12 ships 3.21.
COMPAT_PATCHES: tuple[tuple[str, str, str], ...] = (
    (
        "src/caffe/util/io.cpp",
        "coded_input->SetTotalBytesLimit(kProtoReadBytesLimit, 536870912);",
        "coded_input->SetTotalBytesLimit(kProtoReadBytesLimit);",
    ),
)

# Debian 12 packages the build needs.
BUILD_DEPENDS: tuple[str, ...] = (
    "cmake",
    "make",
    "g++",
    "libprotobuf-dev",
    "protobuf-compiler",
    "libgoogle-glog-dev",
    "libgflags-dev",
    "libhdf5-dev",
    "libopenblas-dev",
    "libboost-system-dev",
    "libboost-thread-dev",
    "libboost-filesystem-dev",
    "libboost-python-dev",
    "dpkg-dev",
    "patchelf",
)

# CMake flags that do not depend on the interpreter (those are added by build.py).
CMAKE_FLAGS: tuple[str, ...] = (
    "-DCPU_ONLY=ON",
    "-DUSE_OPENCV=OFF",
    "-DUSE_LEVELDB=OFF",
    "-DUSE_LMDB=OFF",
    "-DBLAS=Open",
    "-DBUILD_docs=OFF",
    "-DBUILD_python_layer=ON",
    "-DCMAKE_BUILD_TYPE=Release",
)
MAKE_TARGETS: tuple[str, ...] = ("caffe", "pycaffe")

# Python packages pycaffe imports at `import caffe` (pip name, import name).
PYCAFFE_RUNTIME: tuple[tuple[str, str], ...] = (
    ("six", "six"),
    ("scikit-image", "skimage"),
    ("protobuf", "google.protobuf"),
)

# Bump when the way an entry is assembled changes, so old entries are not taken as current.
RECIPE_VERSION = 1
