# Sourced by .ci/run and .ci/lock: fresh virtualenvs, so that nothing on the machine (its site-packages, a version
# installed last month) can hide a missing install step or a new release that breaks us.
# Every set keeps torch at the CPU build that ships on this kind of machine (the Makefile's TORCH_SPEC; an unpinned
# torch resolves to a multi-GB CUDA wheel) and varies the rest: transformers, accelerate, datasets, TRL, PEFT, ...

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
TORCH_SPEC=$(make --no-print-directory -s print-torch-spec)

# fresh_python NAME: the python of a new virtualenv, with a current pip.
fresh_python() {
    python3 -m venv "$work/$1"
    "$work/$1/bin/python" -m pip install --quiet --upgrade pip
    echo "$work/$1/bin/python"
}

# constraints_file SET: the pip constraints of a version set.
#   lock    constraints.txt: the versions the suite last passed with, what the README's commands install;
#   newest  the newest releases setup.cfg's ranges allow (only torch pinned);
#   oldest  setup.cfg's lower bounds, each pinned (`name>=X` -> `name==X`).
constraints_file() {
    case "$1" in
        lock) echo constraints.txt ;;
        newest) echo "$TORCH_SPEC" > "$work/newest.txt" && echo "$work/newest.txt" ;;
        oldest) python3 .ci/lowest_requirements.py test > "$work/oldest.txt" && echo "$work/oldest.txt" ;;
        *) echo "unknown version set $1" >&2 && return 1 ;;
    esac
}

# show_versions PYTHON: the versions a run tested, for the log.
show_versions() {
    "$1" -m pip list --format=freeze 2>/dev/null \
        | grep -iE '^(torch|transformers|accelerate|datasets|huggingface.hub|tokenizers|safetensors|trl|peft|numpy|gguf)==' \
        | tr '\n' ' '
    echo
}
