/* istio-cni launcher: the executable the container runtime runs from the CNI bin dir.
 *
 * The plugin is Python; the host may have none. The "bundled CPython" form ships its own
 * interpreter beside this launcher (scripts/plugin_bundle.py lays it out):
 *
 *   istio-cni.d/istio-cni                          this program (static, no libc needed)
 *   istio-cni.d/runtime/ld-linux-x86-64.so.2       the bundled dynamic loader
 *   istio-cni.d/runtime/lib/                       the C libraries the interpreter needs
 *   istio-cni.d/runtime/bin/python3.11             the interpreter
 *   istio-cni.d/runtime/lib/python3.11/            the stdlib modules the plugin imports
 *                                                  and the plugin (cni_plugin/), as .pyc
 *
 * It finds its own directory through /proc/self/exe (the runtime usually execs a symlink
 * into the directory) and replaces itself with the bundled loader running the bundled
 * interpreter, isolated (-I: no PYTHON* variables, no user site, no cwd on sys.path) and
 * without site (-S), so nothing on the host can change what runs. Going through the
 * bundled loader means the host's C library is never used either: any x86-64 Linux runs
 * it. Environment, stdin and stdout are the runtime's, untouched.
 *
 * Failures print a CNI error (JSON on stdout, as the runtime expects) naming the file and
 * what to do; the exit status is 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define ENTRY "from cni_plugin.plugin import main; main()"

static void json_string(const char *s) {
    for (; *s; s++) {
        if (*s == '"' || *s == '\\')
            putchar('\\');
        if ((unsigned char)*s >= 0x20)
            putchar(*s);
    }
}

static int fail(const char *what, const char *path, int err) {
    fputs("{\"cniVersion\":\"1.0.0\",\"code\":999,\"msg\":\"istio-cni: ", stdout);
    json_string(what);
    fputs(" ", stdout);
    json_string(path);
    fputs(": ", stdout);
    json_string(strerror(err));
    fputs("; the plugin's directory is incomplete: restart the istio-cni-node pod on this node "
          "to reinstall it\"}\n", stdout);
    fflush(stdout);
    fprintf(stderr, "istio-cni: %s %s: %s\n", what, path, strerror(err));
    return 1;
}

int main(int argc, char **argv) {
    char dir[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", dir, sizeof dir - 1);
    if (n < 0)
        return fail("cannot find its own directory through", "/proc/self/exe", errno);
    dir[n] = '\0';
    char *slash = strrchr(dir, '/');
    if (slash == NULL)
        return fail("odd executable path", dir, EINVAL);
    *slash = '\0';

    char loader[PATH_MAX], libs[PATH_MAX], python[PATH_MAX];
    if (snprintf(loader, sizeof loader, "%s/runtime/ld-linux-x86-64.so.2", dir) >= PATH_MAX ||
        snprintf(libs, sizeof libs, "%s/runtime/lib", dir) >= PATH_MAX ||
        snprintf(python, sizeof python, "%s/runtime/bin/python3.11", dir) >= PATH_MAX)
        return fail("path too long under", dir, ENAMETOOLONG);

    char *args[argc + 8];
    int i = 0;
    args[i++] = loader;
    args[i++] = "--library-path";
    args[i++] = libs;
    args[i++] = python; /* the loader passes it on as argv[0]: Python finds its prefix by it */
    args[i++] = "-I";
    args[i++] = "-S";
    args[i++] = "-c";
    args[i++] = ENTRY;
    for (int k = 1; k < argc; k++)
        args[i++] = argv[k];
    args[i] = NULL;
    execv(loader, args);
    return fail("cannot start the bundled interpreter", loader, errno);
}
