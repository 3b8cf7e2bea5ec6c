from .anomaly_map import AnomalyMapNet, fit_map_normalization, follow_calibration, map_recipe, map_smoothing
from .baselines import MeanImageBaseline, PCABaseline
from .map_normalization import HealthyMapStatistics, MapNormalizer
from .blocks import MemoryAugmentedSABlock, MemoryTransformerBlock, MultiLevelCrossAttentionDecoderBlock
from .memmc_mae import (
    MEMMC_MAE_ABLATIONS,
    MemMCMAE,
    MemMCMAEAnomalyMap,
    complementary_masks,
    memmc_mae_ablation,
    patchify,
    unpatchify,
)
from .morphaeus import MorphAEus, MorphAEusOutput, convert_original_state_dict
