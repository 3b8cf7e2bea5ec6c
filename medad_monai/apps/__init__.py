"""Entry points built on the package: export, the demo, the paper's task protocol, the map-recipe study, the bundle
command-line helpers, and the MONAI Deploy (``deploy``) and MONAI Label (``label``) apps."""
