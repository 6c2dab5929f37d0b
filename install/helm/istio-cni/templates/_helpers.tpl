{{/*
The effective values: chart defaults < profile < compatibilityVersion < platform < user
values < the user's `cni:` values (Istio's layering: a compatibilityVersion profile brings
back an earlier release's defaults, a platform profile a platform's paths, and `cni:` is
Istio's umbrella prefix, applied last as its chart does).
Use as: {{- $v := include "istio-cni.values" . | fromYaml }}
*/}}
{{- define "istio-cni.values" -}}
{{- $defaults := deepCopy (index .Values "_internal_defaults_do_not_set") -}}
{{- $global := .Values.global | default dict -}}
{{- $profile := dict -}}
{{- with (coalesce .Values.profile $global.profile) -}}
{{- $file := printf "files/profile-%s.yaml" . -}}
{{- $raw := $.Files.Get $file -}}
{{- if not $raw -}}
{{- fail (printf "unknown profile %q: no %s in the chart" . $file) -}}
{{- end -}}
{{- $profile = fromYaml $raw -}}
{{- end -}}
{{- with .Values.compatibilityVersion -}}
{{- $ver := toString . -}}
{{- /* --set compatibilityVersion=1.30 arrives as the number 1.3 */ -}}
{{- if eq $ver "1.3" }}{{ $ver = "1.30" }}{{ end -}}
{{- $file := printf "files/profile-compatibility-version-%s.yaml" $ver -}}
{{- $raw := $.Files.Get $file -}}
{{- if not $raw -}}
{{- fail (printf "unknown compatibility version %s: no %s in the chart (1.24 to 1.30)" $ver $file) -}}
{{- end -}}
{{- $_ := mustMergeOverwrite $profile (fromYaml $raw) -}}
{{- end -}}
{{- with (coalesce .Values.platform $global.platform) -}}
{{- $file := printf "files/profile-platform-%s.yaml" . -}}
{{- $raw := $.Files.Get $file -}}
{{- if not $raw -}}
{{- fail (printf "unknown platform %q: no %s in the chart (gke, k3d, k3s, microk8s, minikube, openshift)" . $file) -}}
{{- end -}}
{{- $_ := mustMergeOverwrite $profile (fromYaml $raw) -}}
{{- end -}}
{{- $user := omit .Values "_internal_defaults_do_not_set" "profile" "compatibilityVersion" "platform" "cni" -}}
{{- $v := mustMergeOverwrite $defaults $profile (deepCopy $user) -}}
{{- with .Values.cni -}}
{{- $v = mustMergeOverwrite $v (deepCopy .) -}}
{{- end -}}
{{- $_ := set $v "platform" (coalesce .Values.platform $global.platform | default "") -}}
{{- $v | toYaml -}}
{{- end -}}

{{/* Istio's labels of every object (its "istio.labels"). */}}
{{- define "istio-cni.labels" -}}
app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/part-of: "istio"
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end -}}

{{/* The component labels Istio's chart puts on its ConfigMap, ServiceAccount and RBAC;
call with (dict "root" $ "v" $v). */}}
{{- define "istio-cni.componentLabels" -}}
app: istio-cni
release: {{ .root.Release.Name }}
istio.io/rev: {{ .v.revision | default "default" }}
install.operator.istio.io/owning-resource: {{ .v.ownerName | default "unknown" }}
operator.istio.io/component: "Cni"
app.kubernetes.io/name: istio-cni
{{ include "istio-cni.labels" .root }}
{{- end -}}

{{/* true when global.resourceScope renders namespaced (or, with "cluster", cluster-scoped)
objects: call with (list $v "namespace"|"cluster"). */}}
{{- define "istio-cni.inScope" -}}
{{- $scope := (index . 0).global.resourceScope | default "all" -}}
{{- if or (eq $scope "all") (eq $scope (index . 1)) }}true{{ end -}}
{{- end -}}

{{/* The image reference, Istio's rule (an image with a "/" is used as it is). */}}
{{- define "istio-cni.image" -}}
{{- if contains "/" .image -}}
{{ .image }}
{{- else -}}
{{ .hub | default .global.hub }}/{{ .image | default "istio-cni-py" }}:{{ .tag | default .global.tag }}{{ with (.variant | default .global.variant) }}-{{ . }}{{ end }}
{{- end -}}
{{- end -}}

{{/* Resource requirements without empty entries (Istio's "istio-cni.resources"). */}}
{{- define "istio-cni.resources" -}}
{{- range $key := list "limits" "requests" }}
{{- $set := dict }}
{{- range $name, $value := (index $ $key | default dict) }}
{{- if $value }}{{ $_ := set $set $name $value }}{{ end }}
{{- end }}
{{- if $set }}
{{ $key }}:
{{- /* printed as Istio prints them: "1" stays the number 1 (a quantity either way) */}}
{{- range $name, $value := $set }}
  {{ $name }}: {{ $value }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}
