# deb.cmake - `cpack` makes a Debian package of what `cmake --install` installs: caked,
# cachectl, libcake and cake.h, cake.pc, the systemd units and sysusers entry, the man pages.
# Build it with tools/deb.sh (a portable Release build installed under /usr); dependencies
# come from dpkg-shlibdeps, so the package names the libraries the binaries really link.
set(CPACK_GENERATOR DEB)
set(CPACK_PACKAGE_NAME caked)
set(CPACK_PACKAGE_VENDOR "caked")
set(CPACK_PACKAGE_CONTACT "caked maintainers <caked@localhost>")
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY "CAKE KV-cache service for LLM inference")
set(CPACK_DEBIAN_PACKAGE_DESCRIPTION "CAKE KV-cache service for LLM inference
caked owns the host and GPU memory that holds attention keys and values for many
inference processes and evicts by CAKE (cascading and adaptive KV cache eviction).
Engines link libcake (cake.h, pkg-config cake); cachectl shows and steers the budget.")
set(CPACK_DEBIAN_PACKAGE_SECTION misc)
set(CPACK_DEBIAN_PACKAGE_HOMEPAGE "https://github.com/caked/caked")
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)
# systemd-sysusers makes the caked user (adduser where it is missing)
set(CPACK_DEBIAN_PACKAGE_RECOMMENDS "systemd")
set(CPACK_DEBIAN_PACKAGE_CONTROL_EXTRA
    ${CMAKE_SOURCE_DIR}/packaging/debian/postinst ${CMAKE_SOURCE_DIR}/packaging/debian/prerm
    ${CMAKE_SOURCE_DIR}/packaging/debian/postrm)
set(CPACK_DEBIAN_PACKAGE_CONTROL_STRICT_PERMISSION ON)
include(CPack)
