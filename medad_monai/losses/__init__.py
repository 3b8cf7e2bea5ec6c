from .mae_loss import MaskedReconstructionLoss
