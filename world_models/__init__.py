"""World models: the :class:`WorldModel` interface and the shared encoders (DESIGN.md, "world_models")."""

from latentrl.world_models.base import CAPABILITIES, WorldModel
from latentrl.world_models.encoders import (
    ENCODERS,
    DreamerEncoder,
    DrQEncoder,
    ObservationEncoder,
    RandomShiftsAug,
    StateEncoder,
    conv_output_size,
    make_encoder,
)

__all__ = [
    "CAPABILITIES",
    "ENCODERS",
    "DrQEncoder",
    "DreamerEncoder",
    "ObservationEncoder",
    "RandomShiftsAug",
    "StateEncoder",
    "WorldModel",
    "conv_output_size",
    "make_encoder",
]
