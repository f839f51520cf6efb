"""A registry of small image classifiers, built for the data's input shape and classes.

Every model takes ``input_shape`` (channels, height, width; default 1x28x28, Fashion-MNIST)
and ``num_classes`` (default 10); the runners pass the data module's. Register a factory
with :func:`register_model`, list names with :func:`list_models`, build with
:func:`build_model`; a factory registered or given by import path is called with those
two keyword arguments (plus its own options). Parameters have readable, flat names (``conv1.weight``,
``fc3.weight``; ResNet-20 follows torchvision: ``layer2.0.conv1.weight``), and every
model names its output layer in the class attribute ``output_layer`` (lottery-ticket
plans prune it at a lower rate); :func:`output_layer_name` reads it.

Initialisation is PyTorch's default everywhere (Kaiming-uniform weights with
``a=sqrt(5)``, uniform biases; BatchNorm weight 1, bias 0); seed with
``torch.manual_seed`` before building for reproducible weights.

>>> sorted(list_models())
['conv2', 'conv4', 'conv6', 'lenet5', 'lenet_300_100', 'resnet20']
>>> model = build_model("lenet_300_100")
>>> [name for name, _ in model.named_parameters()][::2], output_layer_name(model)
(['fc1.weight', 'fc2.weight', 'fc3.weight'], 'fc3')
"""

from __future__ import annotations

import difflib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Literal, TypeVar

import torch
import torch.nn.functional as F
from prunekit.experiments.imports import import_object, registering
from torch import nn

__all__ = [
    "BasicBlock",
    "ConvNet",
    "LeNet5",
    "LeNet300100",
    "ResNet20",
    "build_model",
    "describe_models",
    "list_models",
    "output_layer_name",
    "register_model",
]

ModelFactory = Callable[..., nn.Module]
_F = TypeVar("_F", bound=ModelFactory)

_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[_F], _F]:
    """Decorator registering a model factory (a function or class) under ``name``.

    A name may be registered once; a duplicate raises ``ValueError``.

    >>> @register_model("doctest_mlp")
    ... def doctest_mlp(num_classes: int = 10) -> nn.Module:
    ...     return nn.Sequential(nn.Flatten(), nn.Linear(784, num_classes))
    >>> build_model("doctest_mlp", num_classes=3)(torch.zeros(1, 1, 28, 28)).shape
    torch.Size([1, 3])
    >>> _ = _REGISTRY.pop("doctest_mlp")  # keep the registry clean
    """
    return registering(_REGISTRY, "model", name)


def list_models() -> list[str]:
    """Registered model names, sorted.

    >>> "lenet5" in list_models()
    True
    """
    return sorted(_REGISTRY)


def describe_models() -> dict[str, str]:
    """Each registered name with the first line of its factory's docstring.

    >>> describe_models()["conv4"]
    'Conv-4: 64, 64, pool, 128, 128, pool; fc 256, 256, classes.'
    """
    return {name: _first_line(_REGISTRY[name]) for name in list_models()}


def _first_line(obj: object) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


def build_model(name: str, **kwargs: object) -> nn.Module:
    """Build the model registered as ``name``, passing ``kwargs`` to its factory.

    ``name`` may also be an import path (``package.module.Class``, a class or factory of
    a user's own model, omegaconf ``_target_`` style); the runners call it, like the
    registered ones, with ``num_classes`` and ``input_shape``. An unknown name raises
    ``ValueError`` listing the valid names and the closest match.

    >>> build_model("lenet5", num_classes=5)(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 5])
    >>> build_model("conv4", num_classes=3, input_shape=(3, 32, 32))(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 3])
    >>> build_model("lenet_300")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: unknown model name='lenet_300'; did you mean 'lenet_300_100'? Valid names: ...
    """
    if isinstance(name, str) and name not in _REGISTRY and "." in name.strip("."):
        factory = import_object(name, "model")
        if not callable(factory):
            raise ValueError(f"model={name!r} is not a class or factory")
        model = factory(**kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model={name!r} made a {type(model).__name__}, not an nn.Module")
        return model
    try:
        factory = _REGISTRY[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown model name={name!r}{hint} Valid names: {', '.join(list_models())}"
        ) from None
    return factory(**kwargs)


def output_layer_name(model: nn.Module) -> str:
    """Qualified name of ``model``'s output layer (its weight is ``name + ".weight"``).

    Read from the model's ``output_layer`` attribute; a model without one falls back to
    its last ``nn.Linear`` in module order.

    >>> output_layer_name(build_model("resnet20"))
    'fc'
    >>> output_layer_name(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    '2'
    """
    modules = dict(model.named_modules())
    name = getattr(model, "output_layer", None)
    if name is not None:
        if not isinstance(name, str) or name not in modules:
            raise ValueError(f"{type(model).__name__}.output_layer={name!r} is not a submodule")
        return name
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            f"{type(model).__name__} has no `output_layer` attribute and no nn.Linear layer"
        )
    return linears[-1]


def _check_num_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be an int >= 1")
    return num_classes


Shape = tuple[int, int, int]
_FASHION: Shape = (1, 28, 28)


def _check_input_shape(input_shape: Sequence[int], min_side: int = 1) -> Shape:
    """``(channels, height, width)``, positive ints, each side at least ``min_side``."""
    valid = (
        isinstance(input_shape, tuple | list)
        and len(input_shape) == 3
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in input_shape)
    )
    if not valid:
        raise ValueError(
            f"input_shape={input_shape!r} must be (channels, height, width), positive ints"
        )
    c, h, w = input_shape
    if min(h, w) < min_side:
        raise ValueError(f"input_shape={input_shape!r}: height and width must be >= {min_side}")
    return int(c), int(h), int(w)


class LeNet300100(nn.Sequential):
    """LeNet-300-100: Flatten → fc1 C·H·W→300 → ReLU → fc2 300→100 → ReLU → fc3 100→classes.

    >>> sum(p.numel() for p in LeNet300100().parameters())
    266610
    >>> LeNet300100(input_shape=(3, 32, 32)).fc1.in_features
    3072
    """

    output_layer = "fc3"

    def __init__(self, num_classes: int = 10, input_shape: Shape = _FASHION) -> None:
        num_classes = _check_num_classes(num_classes)
        c, h, w = _check_input_shape(input_shape)
        super().__init__(
            OrderedDict(
                flatten=nn.Flatten(),
                fc1=nn.Linear(c * h * w, 300),
                relu1=nn.ReLU(),
                fc2=nn.Linear(300, 100),
                relu2=nn.ReLU(),
                fc3=nn.Linear(100, num_classes),
            )
        )


class LeNet5(nn.Sequential):
    """LeNet-5 with ReLU and max-pooling (the usual modern variant), any input size >= 12.

    On 1x28x28: conv1 1→6 5x5 pad 2 (28x28) → pool (14) → conv2 6→16 5x5 (10) → pool (5)
    → fc1 400→120 → fc2 120→84 → fc3 84→classes.

    >>> sum(p.numel() for p in LeNet5().parameters())
    61706
    >>> LeNet5(input_shape=(3, 32, 32)).fc1.in_features  # 16 x 6 x 6
    576
    """

    output_layer = "fc3"

    def __init__(self, num_classes: int = 10, input_shape: Shape = _FASHION) -> None:
        num_classes = _check_num_classes(num_classes)
        c, h, w = _check_input_shape(input_shape, min_side=12)
        h, w = (h // 2 - 4) // 2, (w // 2 - 4) // 2
        super().__init__(
            OrderedDict(
                conv1=nn.Conv2d(c, 6, kernel_size=5, padding=2),
                relu1=nn.ReLU(),
                pool1=nn.MaxPool2d(2),
                conv2=nn.Conv2d(6, 16, kernel_size=5),
                relu2=nn.ReLU(),
                pool2=nn.MaxPool2d(2),
                flatten=nn.Flatten(),
                fc1=nn.Linear(16 * h * w, 120),
                relu3=nn.ReLU(),
                fc2=nn.Linear(120, 84),
                relu4=nn.ReLU(),
                fc3=nn.Linear(84, num_classes),
            )
        )


class ConvNet(nn.Sequential):
    """Conv-2/4/6 of Frankle & Carbin (2019), for any input of side >= 2**num_pairs.

    ``num_pairs`` pairs of 3x3 convolutions (padding 1, ReLU) with 64, 128, 256 channels,
    each pair followed by 2x2 max-pooling (28 → 14 → 7 → 3 on Fashion-MNIST), then fc1
    →256 → fc2 256→256 → fc3 256→classes. Layers are named conv1..conv{2 * num_pairs},
    fc1..fc3.

    >>> ConvNet(3).fc1.in_features  # 256 channels x 3 x 3
    2304
    >>> ConvNet(2, input_shape=(3, 32, 32)).conv1.in_channels, ConvNet(2, input_shape=(3, 32, 32)).fc1.in_features
    (3, 8192)
    """

    output_layer = "fc3"

    def __init__(
        self, num_pairs: int, num_classes: int = 10, input_shape: Shape = _FASHION
    ) -> None:
        if num_pairs not in (1, 2, 3):
            raise ValueError(f"num_pairs={num_pairs!r} must be 1, 2 or 3 (Conv-2/4/6)")
        num_classes = _check_num_classes(num_classes)
        in_channels, height, width = _check_input_shape(input_shape, min_side=2**num_pairs)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for pair in range(num_pairs):
            out_channels = 64 * 2**pair
            for k in (2 * pair + 1, 2 * pair + 2):
                layers[f"conv{k}"] = nn.Conv2d(in_channels, out_channels, 3, padding=1)
                layers[f"relu{k}"] = nn.ReLU()
                in_channels = out_channels
            layers[f"pool{pair + 1}"] = nn.MaxPool2d(2)
            height, width = height // 2, width // 2
        layers["flatten"] = nn.Flatten()
        layers["fc1"] = nn.Linear(in_channels * height * width, 256)
        layers["relu_fc1"] = nn.ReLU()
        layers["fc2"] = nn.Linear(256, 256)
        layers["relu_fc2"] = nn.ReLU()
        layers["fc3"] = nn.Linear(256, num_classes)
        super().__init__(layers)


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU.

    When the shape changes, shortcut ``"A"`` subsamples by 2 and zero-pads the channels
    (no parameters, as He et al. 2016 use on CIFAR); ``"B"`` uses a 1x1 conv + BN.

    >>> BasicBlock(16, 32, stride=2)(torch.zeros(1, 16, 28, 28)).shape
    torch.Size([1, 32, 14, 14])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        shortcut: Literal["A", "B"] = "A",
    ) -> None:
        super().__init__()
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut={shortcut!r} must be 'A' (zero-pad) or 'B' (1x1 conv)")
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.pad = out_channels - in_channels
        self.stride = stride
        self.downsample: nn.Module | None = None
        if shortcut == "B" and (stride != 1 or in_channels != out_channels):
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            return self.downsample(x)
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self._shortcut(x))


class ResNet20(nn.Module):
    """CIFAR-style ResNet-20 (He et al. 2016), any input size (global average pooling).

    conv1 3x3 C→16 + BN + ReLU, three stages (``layer1..3``) of three basic blocks with
    16, 32, 64 channels (28 → 14 → 7 on Fashion-MNIST), global average pooling, ``fc``
    64→classes.

    >>> sum(p.numel() for p in ResNet20().parameters())
    269434
    """

    output_layer = "fc"

    def __init__(
        self,
        num_classes: int = 10,
        shortcut: Literal["A", "B"] = "A",
        input_shape: Shape = _FASHION,
    ) -> None:
        super().__init__()
        num_classes = _check_num_classes(num_classes)
        channels = _check_input_shape(input_shape)[0]
        self.conv1 = nn.Conv2d(channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, 1, shortcut)
        self.layer2 = self._stage(16, 32, 2, shortcut)
        self.layer3 = self._stage(32, 64, 2, shortcut)
        self.fc = nn.Linear(64, num_classes)

    @staticmethod
    def _stage(
        in_channels: int, out_channels: int, stride: int, shortcut: Literal["A", "B"]
    ) -> nn.Sequential:
        return nn.Sequential(
            BasicBlock(in_channels, out_channels, stride, shortcut),
            BasicBlock(out_channels, out_channels, 1, shortcut),
            BasicBlock(out_channels, out_channels, 1, shortcut),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


@register_model("lenet_300_100")
def lenet_300_100(num_classes: int = 10, input_shape: Shape = _FASHION) -> LeNet300100:
    """LeNet-300-100 (266,610 parameters at 10 classes).

    >>> lenet_300_100().fc3.out_features
    10
    """
    return LeNet300100(num_classes, input_shape)


@register_model("lenet5")
def lenet5(num_classes: int = 10, input_shape: Shape = _FASHION) -> LeNet5:
    """LeNet-5 with ReLU and max-pooling (61,706 parameters on 1x28x28, 10 classes).

    >>> lenet5().conv1.out_channels
    6
    """
    return LeNet5(num_classes, input_shape)


@register_model("conv2")
def conv2(num_classes: int = 10, input_shape: Shape = _FASHION) -> ConvNet:
    """Conv-2: 64, 64, pool; fc 256, 256, classes.

    >>> conv2().fc1.in_features  # 64 x 14 x 14
    12544
    """
    return ConvNet(1, num_classes, input_shape)


@register_model("conv4")
def conv4(num_classes: int = 10, input_shape: Shape = _FASHION) -> ConvNet:
    """Conv-4: 64, 64, pool, 128, 128, pool; fc 256, 256, classes.

    >>> conv4().fc1.in_features  # 128 x 7 x 7
    6272
    """
    return ConvNet(2, num_classes, input_shape)


@register_model("conv6")
def conv6(num_classes: int = 10, input_shape: Shape = _FASHION) -> ConvNet:
    """Conv-6: 64, 64, pool, 128, 128, pool, 256, 256, pool; fc 256, 256, classes.

    >>> conv6().fc1.in_features  # 256 x 3 x 3
    2304
    """
    return ConvNet(3, num_classes, input_shape)


@register_model("resnet20")
def resnet20(
    num_classes: int = 10, shortcut: Literal["A", "B"] = "A", input_shape: Shape = _FASHION
) -> ResNet20:
    """ResNet-20 with option-A (zero-pad, default) or option-B (1x1 conv) shortcuts.

    >>> resnet20(shortcut="B").layer2[0].downsample is not None
    True
    """
    return ResNet20(num_classes, shortcut, input_shape)
