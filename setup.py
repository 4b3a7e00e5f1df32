"""Install picosnitch as the `picosnitch` command.

bcc (the BPF Compiler Collection) comes from your distribution, as
python3-bpfcc or python3-bcc: the PyPI package named "bcc" is unrelated.
"""
import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import picosnitch  # noqa: E402 - importing has no side effects

# What each optional part needs (the README's "Set-up" names them); bcc is
# not among them: it comes from the distribution.
DASH = ["dash==4.4.1", "plotly==7.1.0", "dash-bootstrap-components==2.0.4"]
EXTRAS = {
    "notifications": ["dbus-python"],
    "virustotal": ["requests"],
    "geoip": ["geoip2", "requests"],
    "dash": DASH,
    "full": ["dbus-python", "requests", "geoip2"] + DASH,
}

setup(
    name="picosnitch",
    version=picosnitch.VERSION,
    description="See which programs use the network: BPF traffic log, hashes, desktop notifications",
    long_description=open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    url="https://github.com/elesiuta/picosnitch",
    license="GPL-3.0-or-later",
    python_requires=">=3.9",
    py_modules=["picosnitch"],
    entry_points={"console_scripts": ["picosnitch = picosnitch:main"]},
    extras_require=EXTRAS,
    classifiers=[
        "Environment :: No Input/Output (Daemon)",
        "License :: OSI Approved :: GNU General Public License v3 or later (GPLv3+)",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Topic :: System :: Monitoring",
        "Topic :: System :: Networking :: Monitoring",
    ],
)
