#!/bin/sh
# Print the uv settings that match pip's own configuration, for `mlflow run . --env-manager uv`:
#
#     eval "$(sh scripts/uv-env.sh)"
#     mlflow run . -e tune --env-manager uv -P data=data
#
# uv reads neither pip.conf nor PIP_* variables: where pip installs from a local index or mirror, with
# find-links or a constraints file, uv would otherwise resolve against PyPI alone (for torch, a CUDA
# build of several GB). pip's environment variables win over its files, as they do for pip.
# pip takes the best version from all its indexes; uv by default only from the first index that has the package,
# which may lack the lock's version (UV_INDEX_STRATEGY makes uv choose as pip does).
# uv never downloads a Python here: the environment uses an installed one (conda.yaml's python=3.11).
PIP="${PIP:-python3 -m pip}"
$PIP config list 2>/dev/null | sort -r | while IFS= read -r line; do
    key=${line%%=*}
    value=${line#*=}
    value=${value#\'}
    value=${value%\'}
    case ${key#*.} in
        index-url) echo "export UV_INDEX_URL='$value'" ;;
        extra-index-url) echo "export UV_EXTRA_INDEX_URL='$(echo $value)'" ;;
        find-links) echo "export UV_FIND_LINKS='$(echo $value | tr ' ' ',')'" ;;
        constraint) echo "export UV_CONSTRAINT='$(echo $value)'" ;;
    esac
done
echo "export UV_INDEX_STRATEGY=unsafe-best-match"
echo "export UV_PYTHON_DOWNLOADS=never"
