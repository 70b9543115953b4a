# Sourced by the Makefile's demo and bench targets: preloads tcmalloc where the system has it.
#
# Why: on CPU, every XLA train step allocates its temporary buffer (809 MB for TResNet-M 224,
# batch 8) and about 15 scratch blocks of 42-56 MiB (XLA's Eigen 3x3 convolutions at 56x56).
# glibc's malloc gives each block over 32 MiB its own mapping and unmaps it at free, so the step
# page-faults and zero-fills all of it again: 209,000 faults and 10% of the process's CPU time
# per step. tcmalloc keeps freed memory for reuse: 5-14% off the CPU step (BENCHMARKS.md, 'The
# allocator'). The allocator is chosen when a process starts, so it cannot be set from Python.
# Install: `apt-get install libtcmalloc-minimal4` (Debian/Ubuntu), `dnf install gperftools-libs`.
# Nothing changes where LD_PRELOAD is already set (another allocator, a profiler) or where
# KMCL_TCMALLOC=0.
if [ -z "${LD_PRELOAD:-}" ] && [ "${KMCL_TCMALLOC:-1}" != 0 ]; then
  for _kmcl_lib in /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \
      /usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4 /usr/lib64/libtcmalloc_minimal.so.4; do
    if [ -e "$_kmcl_lib" ]; then
      export LD_PRELOAD=$_kmcl_lib
      # gperftools reports each allocation over 1 GB on stderr; a large batch makes several.
      export TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=${TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD:-1099511627776}
      break
    fi
  done
  unset _kmcl_lib
fi
