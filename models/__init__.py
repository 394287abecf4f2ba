"""Reference nets written with graphc's Python builder (graphc.frontend.netspec).

Each module has one function that returns a ``NetSpec`` for the deploy (inference) net,
with an ``Input`` layer whose batch size is the ``batch`` argument; ``.to_proto()`` gives the
``NetParameter``, ``.to_prototxt()`` the text.  They mirror the public model-zoo
definitions layer for layer (names, blobs, parameters)::

    import models
    net = models.googlenet.googlenet(batch=2).to_proto()      # or models.MODELS["googlenet"]
"""
from __future__ import annotations

from . import caffenet, cifar10_quick, googlenet, lenet, mobilenet, resnet50, squeezenet11

#: model name -> function(batch=..., ...) returning its NetSpec
MODELS = {
    "lenet": lenet.lenet,
    "cifar10_quick": cifar10_quick.cifar10_quick,
    "caffenet": caffenet.caffenet,
    "googlenet": googlenet.googlenet,
    "resnet50": resnet50.resnet50,
    "squeezenet11": squeezenet11.squeezenet11,
    "mobilenet": mobilenet.mobilenet,
}

__all__ = ["MODELS", *MODELS]
