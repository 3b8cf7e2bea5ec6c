from .mae_loss import MaskedReconstructionLoss
from .morphaeus_loss import MorphAEusLoss, morphaeus_beta
from .perceptual import VGG19PerceptualLoss
