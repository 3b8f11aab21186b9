/*
 * ort_timer.c: measures the wall time aswa-merge spends inside ONNX Runtime's forward
 * passes (OrtApi::Run), without changing the tool.
 *
 * aswa-merge opens libonnxruntime with dlopen (the `ort` crate's load-dynamic) and takes
 * the C API table from its OrtGetApiBase. This library exports its own OrtGetApiBase,
 * so pointing the tool at it (ORT_DYLIB_PATH=.../libort_timer.so) makes it:
 *   - dlopen the real library named by ASWA_BENCH_REAL_ORT,
 *   - hand the real OrtApiBase's GetApi through, after replacing the table's `Run`
 *     entry (index 9 of struct OrtApi in onnxruntime_c_api.h: CreateStatus,
 *     GetErrorCode, GetErrorMessage, CreateEnv, CreateEnvWithCustomLogger,
 *     EnableTelemetryEvents, DisableTelemetryEvents, CreateSession,
 *     CreateSessionFromArray, Run) by a wrapper that adds up CLOCK_MONOTONIC time,
 *   - write {"run_calls": N, "run_seconds": S, "session_creates": K,
 *     "session_create_seconds": C, "bind_calls": B, "bind_seconds": T, and the wall-clock
 *     marks t_ort_loaded, t_first_run, t_last_run_end, t_exit} to the file named by
 *     ASWA_BENCH_ORT_TIMES when the process exits.
 * CreateSessionFromArray (index 8) is timed as well. With --io-binding on the forward
 * passes are RunWithBinding calls (index 133), counted with `Run`'s; the IoBinding's
 * BindInput (index 136), which copies a host value to the device where the session wants
 * it there, is timed apart ("bind_calls", "bind_seconds"). (Indices: the order of the
 * fields of ort-sys 2.0.0-rc.15's OrtApi, which is the C header's.) Everything else goes
 * straight to the real library. The only cost added is three clock_gettime calls per
 * forward pass and two per timed call of the others.
 *
 * Build: cc -O2 -shared -fPIC -o libort_timer.so benches/ort_timer.c -ldl
 * (scripts/bench.sh does this). Linux/glibc only.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

typedef void *OrtStatusPtr;
typedef struct {
    const void *(*GetApi)(uint32_t version);
    const char *(*GetVersionString)(void);
} OrtApiBase;

typedef OrtStatusPtr (*RunFn)(void *session, const void *run_options,
                              const char *const *input_names, const void *const *inputs,
                              size_t input_len, const char *const *output_names,
                              size_t output_names_len, void **outputs);
typedef OrtStatusPtr (*RunWithBindingFn)(void *session, const void *run_options,
                                         const void *binding);
typedef OrtStatusPtr (*BindInputFn)(void *binding, const char *name, const void *value);
typedef OrtStatusPtr (*CreateFromArrayFn)(const void *env, const void *model_data,
                                          size_t model_data_length, const void *options,
                                          void **out);

enum {
    RUN_INDEX = 9,
    CREATE_FROM_ARRAY_INDEX = 8,
    RUN_WITH_BINDING_INDEX = 133,
    BIND_INPUT_INDEX = 136
};

static const OrtApiBase *real_base;
static OrtApiBase wrapped_base;
static RunFn real_run;
static CreateFromArrayFn real_create;
static RunWithBindingFn real_run_with_binding;
static BindInputFn real_bind_input;
static double run_seconds, create_seconds, bind_seconds;
static long run_calls, create_calls, bind_calls;
/* Wall-clock (CLOCK_REALTIME) marks, to split a run into phases: when this library was
 * loaded (the tool loads ONNX Runtime after reading and hashing its inputs), when the
 * first forward pass started, when the last one ended, and when the process exited. */
static double t_loaded, t_first_run, t_last_run_end;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double wall(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

__attribute__((constructor)) static void loaded(void) { t_loaded = wall(); }

static OrtStatusPtr timed_run(void *session, const void *run_options,
                              const char *const *input_names, const void *const *inputs,
                              size_t input_len, const char *const *output_names,
                              size_t output_names_len, void **outputs) {
    if (!run_calls) t_first_run = wall();
    double t0 = now();
    OrtStatusPtr s = real_run(session, run_options, input_names, inputs, input_len,
                              output_names, output_names_len, outputs);
    run_seconds += now() - t0;
    run_calls++;
    t_last_run_end = wall();
    return s;
}

static OrtStatusPtr timed_run_with_binding(void *session, const void *run_options,
                                           const void *binding) {
    if (!run_calls) t_first_run = wall();
    double t0 = now();
    OrtStatusPtr s = real_run_with_binding(session, run_options, binding);
    run_seconds += now() - t0;
    run_calls++;
    t_last_run_end = wall();
    return s;
}

static OrtStatusPtr timed_bind_input(void *binding, const char *name, const void *value) {
    double t0 = now();
    OrtStatusPtr s = real_bind_input(binding, name, value);
    bind_seconds += now() - t0;
    bind_calls++;
    return s;
}

static OrtStatusPtr timed_create(const void *env, const void *model_data,
                                 size_t model_data_length, const void *options, void **out) {
    double t0 = now();
    OrtStatusPtr s = real_create(env, model_data, model_data_length, options, out);
    create_seconds += now() - t0;
    create_calls++;
    return s;
}

static void patch(void **slot, void *with, void **old) {
    long page = sysconf(_SC_PAGESIZE);
    uintptr_t start = (uintptr_t)slot & ~(uintptr_t)(page - 1);
    if (mprotect((void *)start, (size_t)page * 2, PROT_READ | PROT_WRITE) != 0) {
        perror("ort_timer: mprotect");
        abort();
    }
    *old = *slot;
    *slot = with;
}

static const void *wrapped_get_api(uint32_t version) {
    void **api = (void **)real_base->GetApi(version);
    if (api && !real_run) {
        patch(&api[RUN_INDEX], (void *)timed_run, (void **)&real_run);
        patch(&api[CREATE_FROM_ARRAY_INDEX], (void *)timed_create, (void **)&real_create);
        patch(&api[RUN_WITH_BINDING_INDEX], (void *)timed_run_with_binding,
              (void **)&real_run_with_binding);
        patch(&api[BIND_INPUT_INDEX], (void *)timed_bind_input, (void **)&real_bind_input);
    }
    return api;
}

const OrtApiBase *OrtGetApiBase(void) {
    if (!real_base) {
        const char *path = getenv("ASWA_BENCH_REAL_ORT");
        if (!path) {
            fprintf(stderr, "ort_timer: set ASWA_BENCH_REAL_ORT to the real libonnxruntime\n");
            abort();
        }
        void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
        if (!h) {
            fprintf(stderr, "ort_timer: %s\n", dlerror());
            abort();
        }
        const OrtApiBase *(*get)(void) = (const OrtApiBase *(*)(void))dlsym(h, "OrtGetApiBase");
        if (!get) {
            fprintf(stderr, "ort_timer: no OrtGetApiBase in %s\n", path);
            abort();
        }
        real_base = get();
        wrapped_base.GetApi = wrapped_get_api;
        wrapped_base.GetVersionString = real_base->GetVersionString;
    }
    return &wrapped_base;
}

__attribute__((destructor)) static void report(void) {
    const char *out = getenv("ASWA_BENCH_ORT_TIMES");
    FILE *f = out ? fopen(out, "w") : stderr;
    if (!f) return;
    fprintf(f,
            "{\"run_calls\": %ld, \"run_seconds\": %.6f, \"session_creates\": %ld, "
            "\"session_create_seconds\": %.6f, \"bind_calls\": %ld, \"bind_seconds\": %.6f, "
            "\"t_ort_loaded\": %.6f, \"t_first_run\": %.6f, "
            "\"t_last_run_end\": %.6f, \"t_exit\": %.6f}\n",
            run_calls, run_seconds, create_calls, create_seconds, bind_calls, bind_seconds, t_loaded, t_first_run,
            t_last_run_end, wall());
    if (out) fclose(f);
}
