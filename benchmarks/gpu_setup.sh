#!/usr/bin/env bash
# The GPU set-up docs/results.md "Reproduce" needs on a machine with the GPU image (Python 3.12, x86-64, torch 2.11
# and CUDA there; no registry access):
#   bash benchmarks/gpu_setup.sh wheels DEST      here, where pip reaches PyPI: the wheels the image lacks
#                                                 (benchmarks/gpu_wheels.txt) into DEST; on the GPU machine:
#                                                 pip install --no-index --no-deps --target /tmp/site DEST/*.whl
#                                                 (benchmarks/gpu_h200.sh WHEELS_DIR does this)
#   bash benchmarks/gpu_setup.sh fa4 DEST         here: FlashAttention-4 and the CuTe DSL, split in two folders
#                                                 because its 92 MB libs-cu13 wheel exceeds what one transfer to a
#                                                 lent GPU machine carries (64 MiB): DEST/a (part 1 of that wheel)
#                                                 and DEST/b (part 2 and the small wheels); ~3 min of xz on 2 cores
#   bash benchmarks/gpu_setup.sh fa4-stage DEST/a           GPU machine, call 1: leaves part 1 in /tmp/fa4-stage
#   eval "$(bash benchmarks/gpu_setup.sh fa4-install DEST/b)"   call 2, while that machine is still held:
#                                                 installs FA4 into /tmp/fa4-site and puts it on PYTHONPATH
# Where pip on the GPU machine reaches PyPI, `pip install ".[fa4]"` replaces the fa4 steps.
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/{/^#SBATCH/d;/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
command=${1:?usage: gpu_setup.sh wheels|fa4|fa4-stage|fa4-install DIR}
dir=${2:?usage: gpu_setup.sh $command DIR}

download() {  # wheels for the GPU image's Python 3.12 on x86-64, whatever this machine runs
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        --platform any -d "$@" 2> >(grep -v "WARNING: Location" >&2)
}

case $command in
    wheels)
        mkdir -p "$dir"
        download "$dir" -r "$here/gpu_wheels.txt"
        echo "wheels in $dir: $(ls "$dir"/*.whl | wc -l) files, $(du -sh "$dir" | cut -f1)"
        ;;
    fa4)
        mkdir -p "$dir/a" "$dir/b"
        tmp=$(mktemp -d)
        trap 'rm -rf "$tmp"' EXIT
        download "$dir/b" flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
            nvidia-cutlass-dsl-libs-core==4.8.1 quack-kernels==0.6.5 apache-tvm-ffi==0.1.15.post2 \
            torch-c-dlpack-ext==0.1.5
        download "$tmp" nvidia-cutlass-dsl-libs-cu13==4.8.1
        mkdir "$tmp/x" && python3 -m zipfile -e "$tmp"/nvidia_cutlass_dsl_libs_cu13-*.whl "$tmp/x"
        tar cf - -C "$tmp/x" . | xz -T0 -6 > "$tmp/cu13.tar.xz"
        head -c 56000000 "$tmp/cu13.tar.xz" > "$dir/a/part1"
        tail -c +56000001 "$tmp/cu13.tar.xz" > "$dir/b/part2"
        echo "fa4 in $dir: a $(du -sh "$dir/a" | cut -f1), b $(du -sh "$dir/b" | cut -f1)"
        ;;
    fa4-stage)
        mkdir -p /tmp/fa4-stage && cp "$dir/part1" /tmp/fa4-stage/ && echo "fa4: part 1 staged" >&2
        ;;
    fa4-install)
        if [ ! -f /tmp/fa4-stage/part1 ]; then
            echo "fa4: part 1 is not on this machine (it was handed back after call 1): run fa4-stage and this" \
                 "call again" >&2
            exit 3
        fi
        if [ ! -d /tmp/fa4-site/flash_attn ]; then
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/fa4-site \
                "$dir"/*.whl 2> >(grep -v WARNING >&2) >&2
            # after pip: pip --target would replace the nvidia_cutlass_dsl folder this adds to
            cat /tmp/fa4-stage/part1 "$dir/part2" | xz -d | tar x -C /tmp/fa4-site
        fi
        # pip --target does not read the CuTe DSL's .pth: its package folder goes on PYTHONPATH too
        site="/tmp/fa4-site:/tmp/fa4-site/nvidia_cutlass_dsl/dsl_packages"
        PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} python3 -c "import flash_attn.cute" >&2 || exit 3
        echo "fa4: flash_attn.cute ready" >&2
        echo "export PYTHONPATH=$site\${PYTHONPATH:+:\$PYTHONPATH}"
        ;;
    *)
        echo "gpu_setup.sh: unknown command $command; use wheels, fa4, fa4-stage or fa4-install" >&2
        exit 2
        ;;
esac
