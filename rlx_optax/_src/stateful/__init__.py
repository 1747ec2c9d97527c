"""The crate's name-keyed optimizer objects (the seed API), on top of the pure transforms.

- `optimizer`: the `Optimizer` base class (per-name state, the trait's methods);
- `compiled`: the jitted step over the pure transform of one configuration;
- `checks`: validation of every call before any state changes;
- `checkpoint`: ``state_dict`` / ``load_state_dict`` (nested or flat for ``np.savez``);
- `classes`: ``Sgd``, ``AdamW``, ... generated from `registry.ALGORITHMS`.
"""

from rlx_optax._src.stateful.classes import CLASSES as CLASSES
from rlx_optax._src.stateful.classes import get as get
from rlx_optax._src.stateful.compiled import own_buffers as own_buffers
from rlx_optax._src.stateful.optimizer import Optimizer as Optimizer

globals().update(CLASSES)
