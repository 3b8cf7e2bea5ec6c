"""``python -m medad_monai.apps.deploy -i <dicom dir> -o <out dir> -m <bundle dir>`` or ``python <this folder> ...``.

Absolute imports, so the folder also runs as a script (MONAI Deploy's ``python <app dir>`` and MAP entry point).
"""

from medad_monai.apps.deploy.app import main

if __name__ == "__main__":
    main()
