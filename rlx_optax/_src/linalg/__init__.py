from rlx_optax._src.linalg._precision import check_precision as check_precision
from rlx_optax._src.linalg._precision import resolve_precision as resolve_precision
from rlx_optax._src.linalg.eigen import apply_along_axes as apply_along_axes
from rlx_optax._src.linalg.eigen import axis_cross_gram as axis_cross_gram
from rlx_optax._src.linalg.eigen import axis_gram as axis_gram
from rlx_optax._src.linalg.eigen import canonical_column_signs as canonical_column_signs
from rlx_optax._src.linalg.eigen import permute_axis as permute_axis
from rlx_optax._src.linalg.eigen import power_of_two_scale as power_of_two_scale
from rlx_optax._src.linalg.eigen import qr_refresh as qr_refresh
from rlx_optax._src.linalg.eigen import symmetric_eigenbasis as symmetric_eigenbasis
from rlx_optax._src.linalg.factored import factored_second_moment as factored_second_moment
from rlx_optax._src.linalg.factored import reconstruct_second_moment as reconstruct_second_moment
from rlx_optax._src.linalg.newton_schulz import CUBIC_NS_COEFFS as CUBIC_NS_COEFFS
from rlx_optax._src.linalg.newton_schulz import DEFAULT_NS_COEFFS as DEFAULT_NS_COEFFS
from rlx_optax._src.linalg.newton_schulz import newton_schulz as newton_schulz
from rlx_optax._src.linalg.stiefel import gram_schmidt_rows as gram_schmidt_rows
from rlx_optax._src.linalg.stiefel import stiefel_tangent_projection as stiefel_tangent_projection
from rlx_optax._src.linalg.triangular import lie_group_factor_step as lie_group_factor_step
from rlx_optax._src.linalg.triangular import solve_upper_triangular as solve_upper_triangular
from rlx_optax._src.linalg.triangular import (
    spectral_norm_lower_bound as spectral_norm_lower_bound,
)
from rlx_optax._src.linalg.triangular import (
    upper_triangular_matmul as upper_triangular_matmul,
)
from rlx_optax._src.linalg.triangular import (
    upper_triangular_product as upper_triangular_product,
)
