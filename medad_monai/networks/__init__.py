from .anomaly_map import AnomalyMapNet, map_smoothing
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
