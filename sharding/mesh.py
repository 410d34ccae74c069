"""Device mesh from a config and the one table mapping logical axis names to mesh axes.

`DEFAULT_RULES` (overridden by a config's `sharding_rules`) places every array of the project:
parameters by the names on their Params, activations and caches by the names below, through a
`Layout` (mesh + rules), which jitted code takes as a static argument.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "seq", "tensor")

# Logical name -> mesh axis (or tuple of axes, or None = replicated). One table for the project;
# configs may override entries.
#   batch         rows of a batch (prompts, sequences)
#   length        a prompt's tokens: the ring axis of the sequence-parallel forward (MR-SP stage 2);
#                 replicated ("") = no sequence parallelism, every device runs whole prompts
#   frames        a clip's frames in the vision tower (MR-SP stage 1)
#   cache_length  the shared prefix K/V cache (MR-SP stage 3)
#   branches      a prompt's G response branches against that cache (decode and the update): each
#                 device runs its share of them; on the cache_length axis their queries meet the
#                 prefix shards by an all-gather and the softmax partials come back reduce-scattered
#   embed .. vocab  parameter dimensions; layers: the stacked-layer axis of scanned weights
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "length": "seq",
    "frames": "seq",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "vocab": "tensor",
    "cache_length": "seq",
    "branches": "seq",
    "layers": None,
}


def rules_to_strings(rules: Mapping[str, object] = DEFAULT_RULES) -> dict[str, str]:
    """A rules table in config form: "" = replicated, "fsdp", "data+fsdp" = several axes."""
    return {k: "" if v is None else v if isinstance(v, str) else "+".join(v) for k, v in rules.items()}


def rules_from_strings(table: Mapping[str, str]) -> dict[str, str | tuple[str, ...] | None]:
    """The config form of a rules table (see `rules_to_strings`) -> rules; DEFAULT_RULES fills
    names the table leaves out. Unknown logical names or mesh axes are errors."""
    rules = dict(DEFAULT_RULES)
    for name, value in dict(table).items():
        if name not in DEFAULT_RULES:
            raise ValueError(f"unknown logical axis {name!r} in sharding rules; known: "
                             f"{sorted(DEFAULT_RULES)}")
        axes = tuple(a.strip() for a in str(value or "").split("+") if a.strip())
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise ValueError(f"sharding rule {name}={value!r}: unknown mesh axes {bad}; valid "
                             f"axes are {MESH_AXES}")
        rules[name] = None if not axes else axes[0] if len(axes) == 1 else axes
    return rules


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Fill one -1 entry with the remaining devices; error when the product does not match."""
    unknown = [k for k in shape if k not in MESH_AXES]
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown}; valid axes are {MESH_AXES}")
    sizes = {ax: int(shape.get(ax, 1)) for ax in MESH_AXES}
    free = [ax for ax, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {free} in {dict(shape)}")
    bad = {ax: s for ax, s in sizes.items() if s == 0 or s < -1}
    if bad:
        raise ValueError(f"mesh axis sizes must be positive or -1, got {bad}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % known:
            raise ValueError(
                f"mesh {dict(shape)}: the fixed axes use {known} devices, which does not divide "
                f"the {num_devices} available devices"
            )
        sizes[free[0]] = num_devices // known
    elif known != num_devices:
        raise ValueError(
            f"mesh {dict(shape)} needs {known} devices but {num_devices} are available; "
            f"set one axis to -1 to use the rest"
        )
    return sizes


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
    """Mesh with axes (data, fsdp, seq, tensor), Auto axis types; `shape` may hold one -1."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = resolve_mesh_shape(shape or {"data": -1}, len(devices))
    dims = tuple(sizes[ax] for ax in MESH_AXES)
    if devices == list(jax.devices()):
        return jax.make_mesh(dims, MESH_AXES, axis_types=(AxisType.Auto,) * len(dims))
    return Mesh(np.asarray(devices).reshape(dims), MESH_AXES, axis_types=(AxisType.Auto,) * len(dims))


def logical_to_spec(
    names: Sequence[str | None] | None,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules: Mapping[str, object] | None = None,
) -> PartitionSpec:
    """PartitionSpec for logical axis `names`.

    With `shape` and `mesh`, a mesh axis that does not divide its dimension (e.g. 4 KV heads over
    tensor=8), or that is already used by an earlier dimension, is dropped, so the dim is replicated
    over it instead of failing.
    """
    if not names:
        return PartitionSpec()
    rules = DEFAULT_RULES if rules is None else rules
    used: set[str] = set()
    out = []
    for i, name in enumerate(names):
        target = rules.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        kept = []
        for ax in axes:
            if ax in used:
                continue
            if mesh is not None:
                size = mesh.shape.get(ax, 1)        # an axis the mesh lacks: size 1
                if size == 1:
                    continue
                done = math.prod(mesh.shape[a] for a in kept)
                if shape is not None and shape[i] % (done * size):
                    continue
            kept.append(ax)
        used.update(kept)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def logical_sharding(names, shape, mesh: Mesh, rules=None) -> NamedSharding:
    """NamedSharding on `mesh` for an array of `shape` with logical axis `names`."""
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def param_shardings(abstract_state, mesh: Mesh, rules=None):
    """Map an nnx state of (abstract) Variables to NamedShardings from their `out_sharding` names."""
    from flax import nnx

    def one(v):
        names = v.get_metadata().get("out_sharding")
        return logical_sharding(names, v.shape, mesh, rules)

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where arrays go: a mesh (None: one device, nothing sharded) and the logical-axis rules
    (DEFAULT_RULES with a config's overrides, as sorted items). Frozen and hashable: jitted
    functions take it as a static argument. Build it with `Layout.of(mesh, rules)`."""
    mesh: Mesh | None = None
    rules: tuple = tuple(sorted(DEFAULT_RULES.items()))

    @classmethod
    def of(cls, mesh: Mesh | None = None, rules: Mapping[str, object] | None = None) -> Layout:
        """`rules` overrides entries of DEFAULT_RULES (None: the defaults)."""
        table = dict(DEFAULT_RULES)
        table.update(rules or {})
        return cls(mesh, tuple(sorted(table.items())))

    @property
    def table(self) -> dict:
        return dict(self.rules)

    def spec(self, names: Sequence[str | None], shape: Sequence[int] | None = None) -> PartitionSpec:
        """PartitionSpec of an array with logical axis `names` (see `logical_to_spec`)."""
        if self.mesh is None:
            return PartitionSpec()
        return logical_to_spec(names, shape, self.mesh, self.table)

    def sharding(self, names, shape) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(names, shape))

    def gathered(self, names, shape) -> NamedSharding:
        """Where a weight with logical `names` is used: its mesh axes that also split activation
        rows (those of `batch`, `length`, `frames`, `branches`, `cache_length`: FSDP storage) are
        gathered, its model-parallel axes (e.g. `tensor`) kept."""
        table = self.table
        rows = set()
        for name in ("batch", "length", "frames", "branches", "cache_length"):
            target = table.get(name)
            rows.update((target,) if isinstance(target, str) else tuple(target or ()))

        def keep(entry):
            axes = [a for a in ((entry,) if isinstance(entry, str) else tuple(entry or ()))
                    if a not in rows]
            return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)

        return NamedSharding(self.mesh, PartitionSpec(*map(keep, self.spec(names, shape))))

    def constrain(self, x, names):
        """`x` constrained to the sharding of its logical `names` (as is without a mesh)."""
        if self.mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, self.sharding(names, x.shape))

    def axis(self, name: str) -> str | None:
        """The one mesh axis of size > 1 that logical `name` maps to (None: not sharded). The
        ring, the frame split and the prefix cache each run over one axis."""
        if self.mesh is None:
            return None
        target = self.table.get(name)
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        live = [a for a in axes if self.mesh.shape.get(a, 1) > 1]
        if len(live) > 1:
            raise ValueError(f"sharding rule {name}={target!r}: {name} runs over one mesh axis, "
                             f"but {live} all have size > 1")
        return live[0] if live else None

    def size(self, name: str) -> int:
        """Devices that logical `name` is split over (1 when not sharded)."""
        axis = self.axis(name)
        return 1 if axis is None else self.mesh.shape[axis]

    def branch_axis(self, rows: int, branches: int) -> str | None:
        """The mesh axis that splits the G `branches` of [rows, G, ...] response arrays when it is
        also the prefix cache's axis (`cache_length`), else None: the shared-prefix attention then
        gathers their queries and reduce-scatters its partials over it. Axes that do not divide
        G are dropped (`logical_to_spec`), so None also means "every device runs all G"."""
        cache = self.axis("cache_length")
        if cache is None:
            return None
        spec = self.spec(("batch", "branches"), (rows, branches))
        return cache if spec[1] == cache else None

    @property
    def seq_axis(self) -> str | None:
        """The ring axis of the sequence-parallel forward ('length'), None when off."""
        return self.axis("length")

    @property
    def pad_multiple(self) -> int:
        """Prompts are padded to a multiple of this: 2 x the ring size when the ring runs (the
        zigzag cuts 2 chunks per device), and of the devices the prefix cache is split over
        (`cache_length`, the ring's axis by default, but rules may split it without a ring)."""
        n = self.size("length")
        return math.lcm(2 * n if n > 1 else 1, self.size("cache_length"))


UNSHARDED = Layout()    # no mesh: one device, nothing sharded (the default layout)
