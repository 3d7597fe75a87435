"""Maps the top-level folders onto the ``aitrain`` package.

``launcher/`` installs as ``aitrain.launcher`` (never as a top-level ``launcher``;
``fabric`` is already a PyPI package), likewise ``fabric/``, ``strategies/`` and
``configs/``; ``api/`` is the ``aitrain`` package itself (``aitrain.submit``).
"""

from setuptools import find_packages, setup

FOLDERS = {
    "api": "aitrain",
    "launcher": "aitrain.launcher",
    "fabric": "aitrain.fabric",
    "strategies": "aitrain.strategies",
    "configs": "aitrain.configs",
}

packages: list[str] = []
package_dir: dict[str, str] = {}
for folder, name in FOLDERS.items():
    packages.append(name)
    package_dir[name] = folder
    for sub in find_packages(folder):
        packages.append(f"{name}.{sub}")
        package_dir[f"{name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"

setup(packages=packages, package_dir=package_dir)
