# The seed's build, on top of cargo (the one build of the code): the C library and ./xalloc.
#
#   make                      the library (lib/) and ./xalloc, the C demo (main.c)
#   make lib                  lib/libxalloc.a, lib/libxalloc.so and lib/xalloc.h
#   make examples             the C examples in examples/c/
#   make install PREFIX=DIR   header, both libraries, xalloc.pc and xalloc-static.pc (for
#                             pkg-config), xallocd, the systemd unit
#   make uninstall PREFIX=DIR removes what install put there
#   make clean                removes lib/, ./xalloc, the C examples (not cargo's target/)
#
# lib/libxalloc.a exports the xalloc_* functions of xalloc.h and nothing else (every other
# symbol of the Rust code in it is made local), so a static link never replaces the
# program's malloc nor clashes with another Rust library. lib/libxalloc.so exports the same
# plus the malloc family, for LD_PRELOAD (or for linking with -lxalloc). Variables: CARGO,
# CC, CFLAGS, PREFIX, DESTDIR, BINDIR, LIBDIR, INCLUDEDIR, PKGCONFIGDIR, UNITDIR.

CARGO        ?= cargo
CC           ?= cc
CFLAGS       ?= -O2 -g
PREFIX       ?= /usr/local
BINDIR       ?= $(PREFIX)/bin
LIBDIR       ?= $(PREFIX)/lib
INCLUDEDIR   ?= $(PREFIX)/include
PKGCONFIGDIR ?= $(LIBDIR)/pkgconfig
UNITDIR      ?= $(PREFIX)/lib/systemd/system

# The warnings every C file of this repository is held to.
WARN     := -std=c99 -Wall -Wextra -Werror -pedantic
# What the Rust standard library in libxalloc.a needs from the system (rustc's
# --print native-static-libs, less libgcc_s and libc, which the compiler driver adds); glibc
# 2.34 and later has them in libc itself.
STATIC_LIBS := -lutil -lrt -lpthread -lm -ldl
# Cargo's target directory (CARGO_TARGET_DIR is honoured). The interposer is the same crate
# with the `interpose` feature, built in a target directory of its own so that the two
# builds do not evict each other.
TARGET_DIR     ?= $(if $(CARGO_TARGET_DIR),$(CARGO_TARGET_DIR),target)
PRELOAD_TARGET := $(TARGET_DIR)/interpose
EXAMPLES := examples/c/quickstart

.PHONY: all lib cargo-static cargo-shared daemon examples install uninstall clean FORCE

all: lib xalloc

lib: lib/libxalloc.a lib/libxalloc.so lib/xalloc.h

# Cargo knows when the Rust code changed: it is asked every time (a no-op when nothing did).
cargo-static:
	$(CARGO) build --release -p xalloc-c

cargo-shared:
	$(CARGO) build --release -p xalloc-c --features interpose --target-dir $(PRELOAD_TARGET)

daemon:
	$(CARGO) build --release -p xalloc-daemon

lib/xalloc.h: capi/include/xalloc.h
	@mkdir -p lib
	cp $< $@

# One relocatable object of the whole static library, every symbol but the header's
# functions made local, archived (deterministically: an unchanged library is not replaced, so
# ./xalloc is not relinked). The COMDAT group of Rust's personality routine's reference
# (DW.ref.rust_eh_personality) is named after its symbol: renamed, so that the linker does
# not fold it into another Rust library's group of the same name, whose symbol is global. (The embedded LLVM bitcode of some of Rust's objects,
# .llvmbc and .llvmcmd, is dropped: binutils' ar hands objects with it to the LLVM linker
# plugin where one is installed, which aborts when it is older than rustc's LLVM.)
lib/libxalloc.a: cargo-static capi/include/xalloc.h
	@mkdir -p lib
	set -e; d=$$(mktemp -d lib/.tmp.XXXXXX); trap 'rm -rf $$d' EXIT; \
	sed -n 's/^[a-z].*[ *]\(xalloc_[a-z_]*\)(.*/\1/p' capi/include/xalloc.h > $$d/exports; \
	ld -r --whole-archive $(TARGET_DIR)/release/libxalloc.a -o $$d/all.o; \
	objcopy --keep-global-symbols=$$d/exports --remove-section=.llvmbc \
		--remove-section=.llvmcmd --remove-section=.llvm_addrsig \
		--redefine-sym DW.ref.rust_eh_personality=xalloc.DW.ref.rust_eh_personality \
		$$d/all.o $$d/xalloc.o; \
	ar rcsD $$d/libxalloc.a $$d/xalloc.o; \
	cmp -s $$d/libxalloc.a $@ || mv $$d/libxalloc.a $@

lib/libxalloc.so: cargo-shared
	@mkdir -p lib
	set -e; d=$$(mktemp -d lib/.tmp.XXXXXX); trap 'rm -rf $$d' EXIT; \
	cp $(PRELOAD_TARGET)/release/libxalloc.so $$d/; \
	cmp -s $$d/libxalloc.so $@ || mv $$d/libxalloc.so $@

xalloc: main.c lib/libxalloc.a lib/xalloc.h
	$(CC) $(WARN) $(CFLAGS) -Ilib -o $@ main.c lib/libxalloc.a $(STATIC_LIBS)

examples: $(EXAMPLES)

examples/c/%: examples/c/%.c lib/libxalloc.a lib/xalloc.h
	$(CC) $(WARN) $(CFLAGS) -Ilib -o $@ $< lib/libxalloc.a $(STATIC_LIBS)

# Made anew every time (FORCE): they name PREFIX and the directories.
%.pc: capi/%.pc.in FORCE
	sed -e 's|@PREFIX@|$(PREFIX)|g' -e 's|@LIBDIR@|$(LIBDIR)|g' \
		-e 's|@INCLUDEDIR@|$(INCLUDEDIR)|g' -e 's|@STATIC_LIBS@|$(STATIC_LIBS)|g' $< > $@

install: lib daemon xalloc.pc xalloc-static.pc
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(LIBDIR) $(DESTDIR)$(INCLUDEDIR) \
		$(DESTDIR)$(PKGCONFIGDIR) $(DESTDIR)$(UNITDIR)
	install -m 644 lib/xalloc.h $(DESTDIR)$(INCLUDEDIR)/xalloc.h
	install -m 644 lib/libxalloc.a $(DESTDIR)$(LIBDIR)/libxalloc.a
	install -m 755 lib/libxalloc.so $(DESTDIR)$(LIBDIR)/libxalloc.so
	install -m 644 xalloc.pc $(DESTDIR)$(PKGCONFIGDIR)/xalloc.pc
	install -m 644 xalloc-static.pc $(DESTDIR)$(PKGCONFIGDIR)/xalloc-static.pc
	install -m 755 $(TARGET_DIR)/release/xallocd $(DESTDIR)$(BINDIR)/xallocd
	sed 's|/usr/local/bin/xallocd|$(BINDIR)/xallocd|g' scripts/xallocd.service \
		> $(DESTDIR)$(UNITDIR)/xallocd.service
	chmod 644 $(DESTDIR)$(UNITDIR)/xallocd.service
	rm -f xalloc.pc xalloc-static.pc

uninstall:
	rm -f $(DESTDIR)$(INCLUDEDIR)/xalloc.h $(DESTDIR)$(LIBDIR)/libxalloc.a \
		$(DESTDIR)$(LIBDIR)/libxalloc.so $(DESTDIR)$(PKGCONFIGDIR)/xalloc.pc \
		$(DESTDIR)$(PKGCONFIGDIR)/xalloc-static.pc \
		$(DESTDIR)$(BINDIR)/xallocd $(DESTDIR)$(UNITDIR)/xallocd.service

clean:
	rm -rf lib xalloc xalloc.pc xalloc-static.pc $(EXAMPLES)

FORCE:
