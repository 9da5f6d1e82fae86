// The checkpoint interval of the WKV kernels, shared by the kernels and the binding (which sizes the buffers).
#pragma once

#ifndef WKV_CHUNK
#define WKV_CHUNK 64
#endif
