"""World models: the :class:`WorldModel` interface, one module per model, and the shared pieces
(DESIGN.md, "world_models — one interface").

- :mod:`~latentrl.world_models.base`: :class:`WorldModel` (feed-forward and recurrent shapes).
- :mod:`~latentrl.world_models.encoders`, :mod:`~latentrl.world_models.layers`,
  :mod:`~latentrl.world_models.sphere`: pixel and state encoders, MLPs, EMA targets, running
  statistics, sphere normalisation.
- One module per model, each owning its loss: :mod:`~latentrl.world_models.td_jepa` (TD-JEPA),
  :mod:`~latentrl.world_models.fb` (FB), :mod:`~latentrl.world_models.metra` (METRA's temporal
  distance), :mod:`~latentrl.world_models.rnd` (RND's distillation pair),
  :mod:`~latentrl.world_models.active_inference` (deep active inference's Gaussian state-space model);
  :mod:`~latentrl.world_models.zero_shot` holds what TD-JEPA and FB share.

``WORLD_MODELS`` names each model class and the agent that builds it (what the conformance suite
walks over).
"""

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

# model class (module:name) -> the agent that builds and trains it
WORLD_MODELS: dict[str, str] = {
    "latentrl.world_models.rnd:RNDModel": "rnd",
    "latentrl.world_models.metra:TemporalDistanceModel": "metra",
    "latentrl.world_models.td_jepa:TDJEPAModel": "td_jepa",
    "latentrl.world_models.fb:FBModel": "fb",
    "latentrl.world_models.active_inference:ActiveInferenceModel": "active_inference",
    "latentrl.world_models.stamo:StaMoModel": "stamo",
    "latentrl.world_models.pv_rnn:PVRNNModel": "pv_rnn",
}

__all__ = [
    "CAPABILITIES",
    "ENCODERS",
    "DrQEncoder",
    "DreamerEncoder",
    "ObservationEncoder",
    "RandomShiftsAug",
    "StateEncoder",
    "WORLD_MODELS",
    "WorldModel",
    "conv_output_size",
    "make_encoder",
]
