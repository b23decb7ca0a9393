// A thin C interface to cuSPARSELt for quantlab's 2:4 sparse runner (loaded with ctypes).
//
// Why a shim: torch._cslt_sparse_mm creates the matmul descriptors and the plan (and
// allocates a workspace) on EVERY call, a fixed ~0.5 ms of host work that makes 2:4
// slower than dense FP16 at transformer shapes. Here a plan is created once per layer
// shape, searched once, and each call is a single cusparseLtMatmul on the caller's
// stream (capturable in a CUDA graph). Memory is owned by the caller (PyTorch tensors);
// the shim only keeps descriptors. Compiled against the real cusparseLt.h, so the
// opaque struct sizes and enum values always match the library that is loaded.
//
// Layout (PyTorch's nn.Linear, y[T, N] = x[T, K] @ W[N, K]^T):
//   A = W, structured (2:4 along K), row-major N x K, op N         (m = N)
//   B = x, dense, row-major T x K read with op T (= K x T)          (n = T)
//   C = D = y, column-major N x T with ld N (= row-major T x N)
#include <cusparseLt.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <new>

namespace {

cusparseLtHandle_t g_handle;
bool g_ready = false;
thread_local char g_error[512] = "";

struct Plan {
    cusparseLtMatDescriptor_t a, b, c;
    cusparseLtMatmulDescriptor_t matmul;
    cusparseLtMatmulAlgSelection_t alg;
    cusparseLtMatmulPlan_t plan;
    bool has_alg = false, has_plan = false;
    int kind = 0;
    void* bias = nullptr;  // the bias address the matmul descriptor was given
};

int fail(const char* what, cusparseStatus_t status) {
    std::snprintf(g_error, sizeof(g_error), "%s failed with cusparseStatus_t %d", what, static_cast<int>(status));
    return static_cast<int>(status) == 0 ? -1 : static_cast<int>(status);
}

#define QL_CHECK(call)                                          \
    do {                                                        \
        cusparseStatus_t status_ = (call);                      \
        if (status_ != CUSPARSE_STATUS_SUCCESS) {               \
            return fail(#call, status_);                        \
        }                                                       \
    } while (0)

// kind: 0 = INT8 x INT8 -> FP16 (INT32 accumulation, per-row float alpha vector, optional FP16 bias)
//       1 = INT8 x INT8 -> INT32 (raw accumulators: the exactness check)
//       2 = FP16 x FP16 -> FP16 (FP32 accumulation, scalar alpha, optional FP16 bias)
bool types_of(int kind, cudaDataType* in, cudaDataType* out, cusparseComputeType* compute) {
    switch (kind) {
        case 0: *in = CUDA_R_8I; *out = CUDA_R_16F; *compute = CUSPARSE_COMPUTE_32I; return true;
        case 1: *in = CUDA_R_8I; *out = CUDA_R_32I; *compute = CUSPARSE_COMPUTE_32I; return true;
        case 2: *in = CUDA_R_16F; *out = CUDA_R_16F; *compute = CUSPARSE_COMPUTE_32F; return true;
        default: return false;
    }
}

void destroy(Plan* p) {
    if (p->has_plan) cusparseLtMatmulPlanDestroy(&p->plan);
#if CUSPARSELT_VERSION >= 700  // older releases have no destroy call for an algorithm selection
    if (p->has_alg) cusparseLtMatmulAlgSelectionDestroy(&p->alg);
#endif
    cusparseLtMatDescriptorDestroy(&p->a);
    cusparseLtMatDescriptorDestroy(&p->b);
    cusparseLtMatDescriptorDestroy(&p->c);
    delete p;
}

}  // namespace

extern "C" {

const char* qlcs_last_error() { return g_error; }

int qlcs_header_version() { return CUSPARSELT_VERSION; }

int qlcs_init(int* version) {
    if (!g_ready) {
        QL_CHECK(cusparseLtInit(&g_handle));
        g_ready = true;
    }
    QL_CHECK(cusparseLtGetVersion(&g_handle, version));
    return 0;
}

int qlcs_plan_create(int64_t m, int64_t n, int64_t k, int kind, int alpha_vector, void* bias, void** out) {
    *out = nullptr;
    if (!g_ready) {
        std::snprintf(g_error, sizeof(g_error), "qlcs_init was not called");
        return -1;
    }
    cudaDataType in_type, out_type;
    cusparseComputeType compute;
    if (!types_of(kind, &in_type, &out_type, &compute)) {
        std::snprintf(g_error, sizeof(g_error), "unknown plan kind %d", kind);
        return -1;
    }
    Plan* p = new (std::nothrow) Plan();
    if (p == nullptr) {
        std::snprintf(g_error, sizeof(g_error), "out of host memory");
        return -1;
    }
    p->kind = kind;
    p->bias = bias;
    int rc = 0;
    auto step = [&](const char* what, cusparseStatus_t status) {
        if (rc == 0 && status != CUSPARSE_STATUS_SUCCESS) rc = fail(what, status);
        return rc == 0;
    };
    // The descriptors are initialized in order; on a failure the ones not yet initialized are
    // zeroed structs, which cusparseLtMatDescriptorDestroy accepts.
    if (step("cusparseLtStructuredDescriptorInit(A)",
             cusparseLtStructuredDescriptorInit(&g_handle, &p->a, m, k, k, 16, in_type, CUSPARSE_ORDER_ROW,
                                                CUSPARSELT_SPARSITY_50_PERCENT)) &&
        step("cusparseLtDenseDescriptorInit(B)",
             cusparseLtDenseDescriptorInit(&g_handle, &p->b, n, k, k, 16, in_type, CUSPARSE_ORDER_ROW)) &&
        step("cusparseLtDenseDescriptorInit(C)",
             cusparseLtDenseDescriptorInit(&g_handle, &p->c, m, n, m, 16, out_type, CUSPARSE_ORDER_COL)) &&
        step("cusparseLtMatmulDescriptorInit",
             cusparseLtMatmulDescriptorInit(&g_handle, &p->matmul, CUSPARSE_OPERATION_NON_TRANSPOSE,
                                            CUSPARSE_OPERATION_TRANSPOSE, &p->a, &p->b, &p->c, &p->c, compute))) {
        if (alpha_vector) {
            int one = 1;
            step("cusparseLtMatmulDescSetAttribute(ALPHA_VECTOR_SCALING)",
                 cusparseLtMatmulDescSetAttribute(&g_handle, &p->matmul, CUSPARSELT_MATMUL_ALPHA_VECTOR_SCALING, &one,
                                                  sizeof(one)));
        }
        if (rc == 0 && bias != nullptr) {
            step("cusparseLtMatmulDescSetAttribute(BIAS_POINTER)",
                 cusparseLtMatmulDescSetAttribute(&g_handle, &p->matmul, CUSPARSELT_MATMUL_BIAS_POINTER, &p->bias,
                                                  sizeof(p->bias)));
        }
        if (rc == 0 && step("cusparseLtMatmulAlgSelectionInit",
                            cusparseLtMatmulAlgSelectionInit(&g_handle, &p->alg, &p->matmul,
                                                             CUSPARSELT_MATMUL_ALG_DEFAULT))) {
            p->has_alg = true;
            if (step("cusparseLtMatmulPlanInit", cusparseLtMatmulPlanInit(&g_handle, &p->plan, &p->matmul, &p->alg))) {
                p->has_plan = true;
            }
        }
    }
    if (rc != 0) {
        destroy(p);
        return rc;
    }
    *out = p;
    return 0;
}

int qlcs_plan_sizes(void* handle, size_t* compressed, size_t* compressed_buffer, size_t* workspace) {
    Plan* p = static_cast<Plan*>(handle);
    QL_CHECK(cusparseLtSpMMACompressedSize(&g_handle, &p->plan, compressed, compressed_buffer));
    QL_CHECK(cusparseLtMatmulGetWorkspace(&g_handle, &p->plan, workspace));
    return 0;
}

int qlcs_prune_check(void* handle, const void* dense, int* d_valid, void* stream) {
    Plan* p = static_cast<Plan*>(handle);
    QL_CHECK(cusparseLtSpMMAPruneCheck(&g_handle, &p->matmul, dense, d_valid, static_cast<cudaStream_t>(stream)));
    return 0;
}

int qlcs_compress(void* handle, const void* dense, void* compressed, void* buffer, void* stream) {
    Plan* p = static_cast<Plan*>(handle);
    QL_CHECK(cusparseLtSpMMACompress(&g_handle, &p->plan, dense, compressed, buffer, static_cast<cudaStream_t>(stream)));
    return 0;
}

// Runs cuSPARSELt's own search over its kernel configurations (it times them and keeps the
// fastest in the plan); returns the chosen configuration id and the workspace it needs.
int qlcs_search(void* handle, const void* alpha, const void* a, const void* b, void* d, void* workspace, void* stream,
                int* alg_id, size_t* workspace_after) {
    Plan* p = static_cast<Plan*>(handle);
    float beta = 0.0f;
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    QL_CHECK(cusparseLtMatmulSearch(&g_handle, &p->plan, alpha, a, b, &beta, d, d, workspace, &s, 1));
    QL_CHECK(cusparseLtMatmulAlgGetAttribute(&g_handle, &p->alg, CUSPARSELT_MATMUL_ALG_CONFIG_ID, alg_id, sizeof(int)));
    QL_CHECK(cusparseLtMatmulGetWorkspace(&g_handle, &p->plan, workspace_after));
    return 0;
}

int qlcs_matmul(void* handle, const void* alpha, const void* a, const void* b, void* d, void* workspace, void* stream) {
    Plan* p = static_cast<Plan*>(handle);
    float beta = 0.0f;
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    QL_CHECK(cusparseLtMatmul(&g_handle, &p->plan, alpha, a, b, &beta, d, d, workspace, &s, 1));
    return 0;
}

void qlcs_plan_destroy(void* handle) {
    if (handle != nullptr) destroy(static_cast<Plan*>(handle));
}

}  // extern "C"
