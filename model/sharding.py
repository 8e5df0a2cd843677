"""How the model's logical axes map onto a device mesh with axes ``data``, ``fsdp``, ``tensor``.

Parameters and activations name their dimensions with the words of the shape legend
(``batch``, ``length``, ``heads``, ``kv``, ``embed``, ``mlp``, ``vocab``); ``LOGICAL_RULES``
below is the one table that turns those names into mesh axes. Flax applies the rules in order
and never uses a mesh axis twice in one array, so the same names serve parameters and
activations: in a parameter ``[vocab, embed]`` the ``embed`` dimension is split over ``fsdp``
(ZeRO-3 style), while in an activation ``[batch, length, embed]`` ``fsdp`` is already taken by
``batch`` and ``embed`` stays whole.

Without a mesh the model runs as it is: the constraints are no-ops.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or axes, or None for replicated). Order matters: earlier rules win.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),  # examples split over data-parallel and fsdp replicas
    ("vocab", "tensor"),  # embedding rows / logits columns: tensor (Megatron) parallel
    ("heads", "tensor"),  # attention heads: tensor parallel
    ("mlp", "tensor"),  # feed-forward inner dimension: tensor parallel
    ("embed", "fsdp"),  # parameters' model dimension: fully sharded data parallel
    ("length", None),
    ("kv", None),
    ("layers", None),  # the stacked-layer axis of scan_layers parameters
)


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """Builds a ``(data, fsdp, tensor)`` mesh with GSPMD-style (Auto) sharding propagation.

    Args:
      data: data-parallel size; -1 takes all devices left over by ``fsdp`` and ``tensor``.
      fsdp: fully-sharded data-parallel size.
      tensor: tensor-parallel size.
      devices: the devices to use (default: all of ``jax.devices()``).

    Raises:
      ValueError: if the sizes do not multiply to the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data == -1:
        if fsdp <= 0 or tensor <= 0 or n % (fsdp * tensor):
            raise ValueError(
                f"mesh fsdp={fsdp} x tensor={tensor} does not divide the {n} available devices"
            )
        data = n // (fsdp * tensor)
    shape = (data, fsdp, tensor)
    if min(shape) <= 0 or int(np.prod(shape)) != n:
        raise ValueError(
            f"mesh (data={data}, fsdp={fsdp}, tensor={tensor}) needs {int(np.prod(shape))} "
            f"devices, but {n} are available"
        )
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices
    )


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None) -> Iterator[None]:
    """Makes ``mesh`` and ``LOGICAL_RULES`` current, so the model's constraints take effect.

    With ``mesh=None`` this does nothing and the model runs unsharded.
    """
    if mesh is None:
        yield
        return
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        yield


def logical_to_sharding(logical_tree, mesh: Mesh):
    """Turns a tree of logical ``PartitionSpec``s (or ``nn.Partitioned`` boxes) into shardings.

    Args:
      logical_tree: e.g. ``nn.get_partition_spec(jax.eval_shape(model.init, ...))``.
      mesh: the device mesh.

    Returns:
      The same tree with a ``NamedSharding`` at every leaf.
    """
    specs = nn.get_partition_spec(logical_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)


def batch_sharding(mesh: Mesh, ndim: int = 2, batch_dim: int = 0) -> NamedSharding:
    """Sharding of an ``ndim`` input whose dimension ``batch_dim`` holds the rows: the rows
    split over ``data`` x ``fsdp`` (the ``batch`` rule), every other dimension whole."""
    logical = tuple("batch" if i == batch_dim else None for i in range(ndim))
    return NamedSharding(mesh, PartitionSpec(*nn.logical_to_mesh_axes(logical, LOGICAL_RULES)))


def place_batch(array: np.ndarray, mesh: Mesh | None) -> jax.Array:
    """Puts a host ``[batch, ...]`` array on the mesh, rows split over ``data`` x ``fsdp``.

    Every process passes the whole array (e.g. an evaluation batch all hosts built alike) and
    contributes the rows its devices own. Without a mesh the array goes to the default device.
    """
    if mesh is None:
        return jax.numpy.asarray(array)
    sharding = batch_sharding(mesh, array.ndim)
    return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])
