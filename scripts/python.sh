# Sourced by the shell scripts, from the repository root: the interpreter they run, $PYTHON if set, else the
# repository's .venv (scripts/install.sh), else python3.
if [ -n "${PYTHON:-}" ]; then python=$PYTHON; elif [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
