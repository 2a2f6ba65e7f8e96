# The native addon transparent capture needs: getsockopt(SO_ORIGINAL_DST),
# which Node does not expose (native/original_dst.cc says why it exists).
# npm runs `node-gyp rebuild` for a package with this file and no install
# script of its own, so `npm ci` / `npm install` build
# build/Release/original_dst.node; `npm rebuild` builds it again.
{
  "targets": [
    {
      "target_name": "original_dst",
      "sources": ["native/original_dst.cc"],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      # Node-API 8 is in every Node >= 12.22, well under engines.node. C++
      # exceptions stay off (node-gyp's default): errors are thrown into JS
      # explicitly, so no C++ exception crosses into Node.
      "defines": ["NAPI_VERSION=8", "NAPI_DISABLE_CPP_EXCEPTIONS"],
      "cflags_cc": ["-Wall", "-Wextra"],
      "xcode_settings": { "MACOSX_DEPLOYMENT_TARGET": "10.15" }
    }
  ]
}
