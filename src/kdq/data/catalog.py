"""The registered data sets, with their upstream addresses and checksums."""

from __future__ import annotations

from kdq.data.bundled import DigitsSource, SyntheticSource
from kdq.data.sources import CifarSource, IdxSource, Source
from kdq.registry import Registry

DATASETS: Registry[Source] = Registry("data set", "kdq datasets")


def _add(source: Source) -> None:
    DATASETS.register(source.name)(source)


# SHA-256 of the upstream .gz files, as pinned by torchvision (prototype datasets, mnist.py)
# and many other projects. The Debian package dataset-fashion-mnist recompresses them, so
# its copies in /usr/share/datasets hash differently; they are found on disk and never fetched.
_FASHION_SHA256 = {
    "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}
# Same sources (torchvision prototype mnist.py, keras/tfds pins); the ossci mirror serves LeCun's bytes.
_MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
# torchvision prototype cifar.py and keras' cifar100 loader; they agree with the MD5s
# published on https://www.cs.toronto.edu/~kriz/cifar.html.
_CIFAR10_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
_CIFAR100_SHA256 = "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7"

_IDX_FILES = "train-images-idx3-ubyte.gz and the other three IDX files"

_add(IdxSource(
    name="fashion-mnist", description="Zalando Fashion-MNIST: 28x28 grey clothing images, 60k train / 10k test",
    input_shape=(1, 28, 28), num_classes=10, crop_padding=2, flip=True,
    base_url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    checksums={f: ("sha256", h) for f, h in _FASHION_SHA256.items()},
    size="30 MB", files_hint=_IDX_FILES, install_hint="install it with `apt-get install dataset-fashion-mnist`",
    classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
))
_add(IdxSource(
    name="mnist", description="MNIST handwritten digits: 28x28 grey images, 60k train / 10k test",
    input_shape=(1, 28, 28), num_classes=10, crop_padding=2, flip=False,  # a mirrored 2 is not a 2
    base_url="https://ossci-datasets.s3.amazonaws.com/mnist/",
    checksums={f: ("sha256", h) for f, h in _MNIST_SHA256.items()},
    size="12 MB", files_hint=_IDX_FILES,
    classes=tuple(str(d) for d in range(10)),
))
_add(CifarSource(
    name="cifar10", description="CIFAR-10: 32x32 colour images of 10 object classes, 50k train / 10k test",
    input_shape=(3, 32, 32), num_classes=10, crop_padding=4, flip=True,
    base_url="https://www.cs.toronto.edu/~kriz/",
    checksums={"cifar-10-python.tar.gz": ("sha256", _CIFAR10_SHA256)},
    size="163 MB", files_hint="cifar-10-python.tar.gz or its cifar-10-batches-py folder",
    archive="cifar-10-python.tar.gz", folder="cifar-10-batches-py",
    train_members=tuple(f"data_batch_{i}" for i in range(1, 6)),
))
_add(CifarSource(
    name="cifar100", description="CIFAR-100: 32x32 colour images of 100 fine classes, 50k train / 10k test",
    input_shape=(3, 32, 32), num_classes=100, crop_padding=4, flip=True,
    base_url="https://www.cs.toronto.edu/~kriz/",
    checksums={"cifar-100-python.tar.gz": ("sha256", _CIFAR100_SHA256)},
    size="161 MB", files_hint="cifar-100-python.tar.gz or its cifar-100-python folder",
    archive="cifar-100-python.tar.gz", folder="cifar-100-python",
    train_members=("train",), test_member="test", meta_member="meta",
    label_key=b"fine_labels", names_key=b"fine_label_names",
))
_add(DigitsSource(
    name="digits", description="scikit-learn handwritten digits: 8x8 grey images, 1,797 samples, 20% held out as test",
    input_shape=(1, 8, 8), num_classes=10, crop_padding=0, flip=False,  # too small to crop
))
_add(SyntheticSource(
    name="synthetic", description="generated tabular problem: 20 features, 10 classes, 10k train / 2k test "
                                  "(options samples, features, classes resize it)",
    input_shape=(20,), num_classes=10, crop_padding=0, flip=False,
))
