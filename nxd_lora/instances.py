"""Trainium instance types: NeuronCores, memory per core, and the software stack each trains with.

One table that ``doctor``, ``plan``, ``launch/`` and the SageMaker spec read, so that an instance
type means the same rank count and memory everywhere.

Facts (AWS's instance pages and Neuron docs as of SDK 2.28/2.34; not read off hardware here):
a Trainium1 chip has 2 NeuronCore-v2 with 32 GiB HBM (16 GiB per core); a Trainium2 chip has 8
NeuronCore-v3 with 96 GiB HBM. On trn2 the runtime groups physical cores into logical ones:
``NEURON_LOGICAL_NC_CONFIG`` (LNC) 2 is the default (4 logical cores of 24 GiB per chip), LNC=1
exposes the 8 physical cores of 12 GiB each.

Stacks: XLA/NxD training (backend ``neuron``) ends with Neuron SDK 2.28, which trn1 keeps; trn2 runs
either that or TorchNeuron (backend ``torchneuron``, SDK >= 2.33); trn3 runs TorchNeuron only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TrainiumInstance:
    name: str                       # EC2 name, e.g. trn1.32xlarge (SageMaker's adds "ml.")
    platform: str                   # trn1 | trn2
    chips: int
    cores_per_chip: int             # physical NeuronCores
    hbm_gib_per_chip: float

    def cores(self, lnc: int | None = None) -> int:
        """NeuronCores the runtime exposes (= ranks per node) at logical-core config ``lnc``."""
        return self.chips * self.cores_per_chip // self.lnc(lnc)

    def core_memory_gib(self, lnc: int | None = None) -> float:
        return self.hbm_gib_per_chip * self.lnc(lnc) / self.cores_per_chip

    def lnc(self, lnc: int | None = None) -> int:
        """The logical-core config: 2 by default on trn2 (1 or 2 allowed), always 1 on trn1."""
        if self.platform == "trn1":
            if lnc not in (None, 1):
                raise ValueError(f"{self.name}: logical NeuronCore config {lnc} is trn2's; trn1 has LNC=1 only")
            return 1
        if lnc not in (None, 1, 2):
            raise ValueError(f"{self.name}: logical NeuronCore config must be 1 or 2 (got {lnc})")
        return lnc or 2

    @property
    def backends(self) -> tuple[str, ...]:
        """Backends that train on this instance, the one to prefer first."""
        return ("neuron",) if self.platform == "trn1" else ("torchneuron", "neuron")


INSTANCES = {i.name: i for i in (
    TrainiumInstance("trn1.2xlarge", "trn1", 1, 2, 32.0),
    TrainiumInstance("trn1.32xlarge", "trn1", 16, 2, 32.0),
    TrainiumInstance("trn1n.32xlarge", "trn1", 16, 2, 32.0),
    TrainiumInstance("trn2.3xlarge", "trn2", 1, 8, 96.0),
    TrainiumInstance("trn2.48xlarge", "trn2", 16, 8, 96.0),
    TrainiumInstance("trn2u.48xlarge", "trn2", 16, 8, 96.0),
)}

# The NxD checkpoint layout each platform's training reads and writes (trn3 has no layout of its
# own in NxD 0.17: its TorchNeuron training uses trn2's, as this project does).
PLATFORM_LAYOUT = {"trn1": "trn1", "trn2": "trn2", "trn3": "trn2"}


def layout_of_platform(platform: str) -> str:
    if platform not in PLATFORM_LAYOUT:
        raise ValueError(f"unknown Trainium platform {platform!r}; choose from {sorted(PLATFORM_LAYOUT)}")
    return PLATFORM_LAYOUT[platform]


def instance(name: str) -> TrainiumInstance:
    """The instance called ``name`` (``ml.`` prefix allowed); unknown names list the known ones."""
    bare = name.removeprefix("ml.")
    if bare not in INSTANCES:
        raise ValueError(f"unknown Trainium instance type {name!r}; known: {sorted(INSTANCES)}")
    return INSTANCES[bare]


DMI_PRODUCT_NAME = Path("/sys/devices/virtual/dmi/id/product_name")


def this_instance_type() -> str | None:
    """The EC2 instance type of this host (Nitro hosts name it in DMI's product name), if Trainium."""
    try:
        name = DMI_PRODUCT_NAME.read_text().strip()
    except OSError:
        return None
    return name if name.split(".")[0][:4] in ("trn1", "trn2", "trn3") else None


def platform_of_instance_type(name: str) -> str:
    """trn1, trn2 or trn3 from an instance type's family (trn1n -> trn1, trn2u -> trn2)."""
    return name.removeprefix("ml.")[:4]
